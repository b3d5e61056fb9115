"""A fault-injecting TCP/TLS proxy for the upstream-fault system tests (see proxy.py)."""

from .certs import expired_server_cert
from .proxy import Event, FaultProxy, Request, Response, fail_instances, multipart_uids, omit_instances

__all__ = ["Event", "FaultProxy", "Request", "Response", "expired_server_cert", "fail_instances",
           "multipart_uids", "omit_instances"]
