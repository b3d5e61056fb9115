"""Work around a race in pynetdicom 3.0.4's association reactor, seen in our system tests.

`Association.send_c_store()` pauses the reactor thread, sends the request and waits for the response on
the DIMSE message queue. The pause is a handshake on `_is_paused`, which the reactor sets to True at the
top of every loop pass, before it knows whether it will block. When the SCU sends its next request while
the reactor is between `_reactor_checkpoint.wait()` returning and `_is_paused = False`, the reactor runs
on, takes the (fast) C-STORE response off the queue itself, logs "Received unexpected C-STORE service
message" and drops it; `send_c_store()` then waits for a response that already came, and the
association ends on the DIMSE timeout. The SCP did answer (its log shows the instance stored).

The fix: a response that the reactor takes off the queue goes back on it, for the `send_*()` call that
is waiting for it. Requests (what the reactor is for) are served as before.
"""

from __future__ import annotations

from pynetdicom.association import Association

_serve_request = Association._serve_request


def _serve_request_keeping_responses(self: Association, msg, context_id: int) -> None:
    if msg is not None and not msg.is_valid_request and not self._sent_release:
        self.dimse.msg_queue.put((context_id, msg))
        return
    _serve_request(self, msg, context_id)


if not getattr(Association._serve_request, "_passerelle_keeps_responses", False):
    _serve_request_keeping_responses._passerelle_keeps_responses = True  # type: ignore[attr-defined]
    Association._serve_request = _serve_request_keeping_responses  # type: ignore[method-assign]
