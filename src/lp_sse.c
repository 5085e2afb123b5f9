/* lp_sse: Server-Sent Events text (see lp_sse.h). */
#include "lp_sse.h"

int lp_sse_preamble_append(lp_buf *b, int64_t retry_ms, int has_start, int64_t start_ts) {
  size_t mark = b->len;
  int rc = lp_buf_append_str(b, "retry: ");
  if (rc == 0) rc = lp_buf_append_i64(b, retry_ms);
  if (rc == 0 && has_start) rc = lp_buf_append_str(b, "\nid: ");
  if (rc == 0 && has_start) rc = lp_buf_append_i64(b, start_ts);
  if (rc == 0) rc = lp_buf_append_str(b, "\n\n");
  if (rc != 0) b->len = mark;
  return rc == 0 ? 0 : -1;
}

int lp_sse_message_append(lp_buf *b, const char *json, size_t json_len, int64_t timestamp, const char *id) {
  size_t mark = b->len;
  int rc = lp_buf_append_str(b, "id: ");
  if (rc == 0) rc = lp_buf_append_i64(b, timestamp);
  if (rc == 0) rc = lp_buf_append_char(b, '_');
  if (rc == 0) rc = lp_buf_append_str(b, id);
  if (rc == 0) rc = lp_buf_append_str(b, "\ndata: ");
  size_t start = 0;
  for (size_t i = 0; rc == 0 && i < json_len; i++) {
    if (json[i] != '\r' && json[i] != '\n') continue;
    rc = lp_buf_append(b, json + start, i - start);
    if (rc == 0) rc = lp_buf_append_str(b, "\ndata: ");
    if (json[i] == '\r' && i + 1 < json_len && json[i + 1] == '\n') i++; /* CR LF is one break */
    start = i + 1;
  }
  if (rc == 0) rc = lp_buf_append(b, json + start, json_len - start);
  if (rc == 0) rc = lp_buf_append_str(b, "\n\n");
  if (rc != 0) b->len = mark;
  return rc == 0 ? 0 : -1;
}
