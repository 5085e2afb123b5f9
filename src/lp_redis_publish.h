/* lp_redis_publish: the Redis engine's publish script call (engine/redis/shard.lua Shard:publish,
 * scripts.lua M.publish) made and its reply and pub/sub message read, without I/O: the same
 * EVALSHA, with the same keys and arguments, as the Lua engine sends for a publish without
 * Idempotency-Key, per-category rules or WAIT. */
#ifndef LP_REDIS_PUBLISH_H
#define LP_REDIS_PUBLISH_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_resp.h"

/* What every publish of one Redis shares. The strings are owned by whoever fills it. */
typedef struct lp_redis_publish_config {
  lp_slice clock_key;      /* P.."clock" */
  lp_slice stream_prefix;  /* P.."s:" (the stream key is it and the category) */
  lp_slice dropped_prefix; /* P.."d:" */
  lp_slice channel;        /* P.."events" */
  int64_t max_event_buffer_size;
  int64_t ttl_ms; /* 0: forever */
} lp_redis_publish_config;

/* The command without its first two strings (EVALSHA and the SHA, or EVAL and the script's text):
 * the key count, the keys and the arguments. The head (lp_redis_publish_head) goes before it.
 * epoch_candidate: 16 characters (Position.epoch_candidate); floor: Position:floor_arg. 0, or -1
 * when memory ran out (out keeps what it had). */
int lp_redis_publish_tail(lp_buf *out, const lp_redis_publish_config *c, lp_slice category, lp_slice data_json,
                          const char *event_id, const char *epoch_candidate, int64_t floor);
/* The command's first part: "*14", then EVALSHA and sha_or_script (eval 0), or EVAL and the
 * script's text (eval 1). 0 or -1 as above. */
int lp_redis_publish_head(lp_buf *out, int eval, lp_slice sha_or_script);

/* The script's reply: 0 with *epoch (pointing into the reply), *ts and *seq for { epoch,
 * timestamp, seq }; 1 for NOSCRIPT (the script must be sent by its text); -1 for an error reply or
 * anything else (*message, pointing into the reply or static, says what). */
int lp_redis_publish_reply(const lp_resp_reply *r, lp_slice *epoch, int64_t *ts, int64_t *seq, lp_slice *message);

/* An event as the publish script announces it on P.."events". */
typedef struct lp_redis_event {
  lp_slice epoch, category, id, data_json; /* point into the message */
  int64_t seq, ts;
} lp_redis_event;

/* Reads "E <epoch> <seq> <timestamp> <category length>\n<category><event id><data JSON>": 0 with
 * *ev filled (the id a UUID, the category UTF-8), -1 when the message is not such an event. */
int lp_redis_event_parse(const char *p, size_t len, lp_redis_event *ev);

#endif
