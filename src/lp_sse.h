/* lp_sse: the text of a Server-Sent Events stream as longpoll.sse writes it: the preamble, one
 * message per event, the missed notice and the heartbeat. Sans-I/O: it appends to the caller's
 * buffer; the HTTP framing (chunks) is the writer's. */
#ifndef LP_SSE_H
#define LP_SSE_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"

/* A comment line: proxies keep the stream open, dead peers show up. */
#define LP_SSE_HEARTBEAT ": heartbeat\n\n"
/* Sent before the events of a catch-up when the buffer dropped some after the cursor. */
#define LP_SSE_MISSED "event: missed\ndata: {\"missed\":true}\n\n"

/* "retry: <retry_ms>\n", then "id: <start_ts>\n" when has_start (a stream "from now on" says
 * where it starts), then the blank line. 0, or -1 when memory ran out (b's length unchanged). */
int lp_sse_preamble_append(lp_buf *b, int64_t retry_ms, int has_start, int64_t start_ts);

/* "id: <timestamp>_<id>\ndata: <json>\n\n", each line break of json (CR LF, CR or LF, which JSON
 * whitespace may hold) starting a new data: line. json: the event's JSON text; id: its UUID
 * (NUL-terminated). 0, or -1 when memory ran out (b's length unchanged). */
int lp_sse_message_append(lp_buf *b, const char *json, size_t json_len, int64_t timestamp, const char *id);

#endif
