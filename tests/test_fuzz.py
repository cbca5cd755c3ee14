"""Fuzzing the running service from its own OpenAPI document (schemathesis, valid and invalid inputs).

For every generated request: never a 5xx, always a JSON answer (but the live page, GET /, in HTML) that matches
the document, and a request the service rejects (4xx) leaves every store file byte-for-byte as it was.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from loadtest.embedded import EmbeddedService
from service.routes import openapi_document
from service.stores.file import FileStore
from tests.conftest import ADMIN_TOKEN, Api, store_files

# The document as the fuzzed service serves it: a file store's, whose PUT /mode accepts the modes it runs.
schema = schemathesis.openapi.from_dict(openapi_document(FileStore.modes()))
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True)
# A schema-valid order can still be refused with 422 when its Idempotency-Key was used with another body.
acceptance = schema.config.checks.positive_data_acceptance
acceptance.expected_statuses = [*acceptance.expected_statuses, "422"]
# gunicorn itself refuses a request line over 4 KB (414) or oversized headers (431), in the same JSON shape.
rejection = schema.config.checks.negative_data_rejection
rejection.expected_statuses = [*rejection.expected_statuses, "413", "414", "431"]

AUTHORIZATION = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    """A service just for fuzzing, with an admin token so mode changes and resets are exercised too."""
    with EmbeddedService(
        workers=2, race_window_ms=0, admin_token=ADMIN_TOKEN, directory=tmp_path_factory.mktemp("fuzz")
    ) as running:
        yield running


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_breaks_the_service_or_changes_the_store_when_rejected(
    case: schemathesis.Case, fuzzed: EmbeddedService
) -> None:
    before = store_files(fuzzed.directory)

    response = case.call(base_url=fuzzed.url, headers=AUTHORIZATION, timeout=30)

    assert response.status_code < 500, f"{case.as_curl_command()} -> {response.status_code} {response.text}"
    if case.path == "/" and response.status_code == 200:
        assert response.headers["content-type"] == ["text/html; charset=utf-8"], case.as_curl_command()  # the page
    else:
        assert response.headers["content-type"] == ["application/json"], case.as_curl_command()
        response.json()
    if case.path == "/orders" and {"after", "offset"} <= set(case.query or {}):
        # OpenAPI 3.0 cannot say that two parameters exclude each other: the pair is schema-valid, and refused.
        assert response.json()["error"] == "invalid_paging", case.as_curl_command()
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
    else:
        case.validate_response(response)
    if 400 <= response.status_code < 500:
        assert store_files(fuzzed.directory) == before, f"{case.as_curl_command()} changed the store"
    if case.method == "PUT" and response.status_code == 200:
        # Keep the next examples fast: a fuzzed race window can be 5 s long.
        Api(fuzzed.url, ADMIN_TOKEN).put("/mode", {"race_window_ms": 0})
