"""The uplink goes out through the configured HTTP CONNECT proxy (as many hospitals require), still with
end-to-end TLS to the PACS; proxy environment variables are ignored."""

from __future__ import annotations

from pathlib import Path

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Study
from harness.proxy import ConnectProxy
from harness.util import free_port, wait_until


def test_uploads_go_through_the_configured_connect_proxy(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    proxy = ConnectProxy().start()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        gw = make_gateway(
            orthanc,
            extra_uplink={"proxy": proxy.url},
            env={"HTTPS_PROXY": dead, "https_proxy": dead, "ALL_PROXY": dead, "all_proxy": dead},
        )
        gw.start()
        few = ct_study.instances[:20]
        send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
        wait_for_instances(orthanc, len(few), timeout=120, what="uploads through the proxy")
        status = wait_until(lambda: (s := gw.status())["sent"] == len(few) and s, 60, "all sent")
        assert status["failed"] == 0 and status["lost"] == 0, status
        assert proxy.connects, "the proxy saw no CONNECT"
        assert set(proxy.connects) == {f"localhost:{orthanc.https_port}"}, proxy.connects
        assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in few})
        gw.stop_ok()
    finally:
        proxy.stop()


def test_proxy_environment_variables_are_ignored(
    orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    proxy = ConnectProxy().start()
    try:
        env = {k: proxy.url for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")}
        gw = make_gateway(orthanc, env=env)
        gw.start()
        few = ct_study.instances[:3]
        send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
        wait_for_instances(orthanc, len(few), timeout=120)
        wait_until(lambda: gw.status()["sent"] == len(few), 60, "all sent")
        assert proxy.connects == [], f"passerelled used a proxy from the environment: {proxy.connects}"
        gw.stop_ok()
    finally:
        proxy.stop()
