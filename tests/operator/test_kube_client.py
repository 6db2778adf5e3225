"""The operator's small API client against kmock: CRUD as dicts, errors, and re-login after a 401."""

from __future__ import annotations

from typing import Any

import pytest
from kmock import KubernetesError

from drift_operator.kube import KubeApiError, KubeClient, KubeCredentials


def _client(emulator: Any, token: str = "t1", reload: Any = None) -> KubeClient:
    return KubeClient(KubeCredentials(server=str(emulator.url).rstrip("/"), token=token), reload=reload)


async def test_create_get_patch_list(kmock: Any) -> None:
    kmock.resources.load_bundled()
    client = _client(kmock)
    try:
        path = "/api/v1/namespaces/ns/configmaps"
        assert await client.get(f"{path}/cm") is None  # 404 is "absent", not an error
        await client.create(
            path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "1"}}
        )
        await client.patch(f"{path}/cm", {"data": {"b": "2"}})
        live = await client.get(f"{path}/cm")
        assert live is not None and live["data"] == {"a": "1", "b": "2"}
        assert [o["metadata"]["name"] for o in await client.list(path, "x=y")] == ["cm"]
        request = kmock[kmock.resource("v1/configmaps")][-1]
        assert request.params == {"labelSelector": "x=y"}
        assert request.headers["Authorization"] == "Bearer t1"
        with pytest.raises(KubeApiError) as info:
            await client.create(path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}})
        assert info.value.status == 409
        assert await client.served_resources("monitoring.coreos.com/v1") == set()
    finally:
        await client.close()


async def test_a_401_reloads_credentials_once(kmock: Any) -> None:
    reloads = []

    def reload() -> KubeCredentials:
        reloads.append(1)
        return KubeCredentials(server=str(kmock.url).rstrip("/"), token="t2")

    def answer(request: Any) -> dict[str, Any]:
        if request.headers.get("Authorization") != "Bearer t2":
            raise KubernetesError(status=401, reason="Unauthorized", message="token expired")
        return {"kind": "ConfigMap", "metadata": {"name": "cm"}}

    kmock["get /api/v1/namespaces/ns/configmaps/cm"] << answer
    client = _client(kmock, token="t1", reload=reload)
    try:
        assert (await client.get("/api/v1/namespaces/ns/configmaps/cm"))["metadata"]["name"] == "cm"
        assert reloads == [1] and client.credentials is not None and client.credentials.token == "t2"
    finally:
        await client.close()


async def test_unreachable_server_is_an_api_error() -> None:
    client = KubeClient(KubeCredentials(server="http://127.0.0.1:9"), timeout_s=2, reload=None)
    try:
        with pytest.raises(KubeApiError) as info:
            await client.get("/api/v1")
        assert info.value.status == 0
    finally:
        await client.close()


async def test_no_credentials_yet() -> None:
    with pytest.raises(KubeApiError, match="not logged in"):
        await KubeClient(reload=None).get("/api/v1")
