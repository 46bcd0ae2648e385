"""Routing on PostgreSQL: configured providers, company keys, circuit breakers, fallbacks."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import delete

from pipeline import circuits, provider_keys, routing
from pipeline.errors import ValidationFailed
from pipeline.pricing import PriceTable
from pipeline.tables import provider_circuits
from providers.local import LocalProvider
from providers.registry import Registry
from providers.stability import StabilityProvider
from tests.builders import make_company

pytestmark = pytest.mark.postgres

ROUTES = {"ROUTE_IMAGE": "stability,local"}


@pytest.fixture
def registry():
    return Registry({"local": LocalProvider(), "stability": StabilityProvider()})


@pytest.fixture(autouse=True)
def closed_circuits(pg_runtime):
    with pg_runtime.engine.begin() as conn:
        conn.execute(delete(provider_circuits))
    yield
    with pg_runtime.engine.begin() as conn:
        conn.execute(delete(provider_circuits))


def _choose(rt, registry, company, requested=None):
    with rt.engine.connect() as conn:
        return routing.choose(conn, registry, ROUTES, company.company_id,
                              content_type="image", requested=requested)


def test_a_company_key_makes_a_keyed_provider_usable_for_that_company_only(pg_runtime,
                                                                           registry):
    rt = pg_runtime
    mine, theirs = make_company(rt.engine), make_company(rt.engine, name="b")
    assert _choose(rt, registry, mine) == "local"
    with pytest.raises(ValidationFailed) as refused:
        _choose(rt, registry, mine, "stability")
    assert refused.value.code == "PROVIDER_NOT_CONFIGURED"
    cipher = provider_keys.cipher(rt.settings.provider_key_secrets)
    provider_keys.set_key(rt.engine, cipher, mine.company_id, "stability", "sk-mine-123")
    assert _choose(rt, registry, mine) == "stability"
    assert _choose(rt, registry, theirs) == "local"


def test_repeated_failures_open_the_circuit_and_routing_avoids_it(pg_runtime):
    rt = pg_runtime
    registry = Registry({"local": LocalProvider(), "stability": StabilityProvider()},
                        frozenset({"stability"}))
    company = make_company(rt.engine)
    opened = [circuits.record_failure(rt.engine, "stability", threshold=3) for _ in range(3)]
    assert opened == [False, False, True]
    assert _choose(rt, registry, company) == "local"
    circuits.record_success(rt.engine, "stability")
    with rt.engine.connect() as conn:
        assert "stability" in circuits.open_providers(conn)  # still cooling down
    with rt.engine.begin() as conn:
        conn.execute(delete(provider_circuits))
    assert _choose(rt, registry, company) == "stability"


def test_every_route_cooling_down_is_a_503(pg_runtime):
    rt = pg_runtime
    registry = Registry({"stability": StabilityProvider()}, frozenset({"stability"}))
    company = make_company(rt.engine)
    for _ in range(circuits.THRESHOLD):
        circuits.record_failure(rt.engine, "stability")
    with pytest.raises(routing.ProviderUnavailable) as refused:
        _choose(rt, registry, company)
    assert refused.value.status == 503


def test_fallback_takes_the_next_provider_that_fits_the_hold(pg_runtime, registry):
    rt = pg_runtime
    company = make_company(rt.engine)

    class Job:
        id = "j"
        provider = "stability"
        content_type = "image"
        prompt = "a boat"
        settings = {"width": 256, "height": 256}
        company_id = company.company_id
        provider_pinned = False

    with rt.engine.connect() as conn:
        prices = PriceTable.from_db(conn)
        assert routing.fallback(conn, registry, ROUTES, Job, hold_amount=Decimal(3),
                                prices=prices) == "local"
        assert routing.fallback(conn, registry, ROUTES, Job, hold_amount=Decimal("0.001"),
                                prices=prices) is None  # local's 0.013 would pass the hold
        Job.provider = "local"
        assert routing.fallback(conn, registry, ROUTES, Job, hold_amount=Decimal(3),
                                prices=prices) is None  # the end of the route


def test_fallback_respects_the_caller(pg_runtime, registry):
    """A named provider, provider-specific settings, or a route that does not name local:
    no fallback, so a job never completes somewhere its caller did not ask for."""
    rt = pg_runtime
    company = make_company(rt.engine)

    def job(**fields):
        values = {"id": "j", "provider": "stability", "content_type": "image",
                  "prompt": "a boat", "settings": {"width": 256}, "provider_pinned": False,
                  "company_id": company.company_id, **fields}
        return type("Job", (), values)

    with rt.engine.connect() as conn:
        prices = PriceTable.from_db(conn)

        def fallback(j, routes=ROUTES):
            return routing.fallback(conn, registry, routes, j, hold_amount=Decimal(3),
                                    prices=prices)

        assert fallback(job()) == "local"
        assert fallback(job(provider_pinned=True)) is None
        assert fallback(job(settings={"width": 256, "stylePreset": "anime"})) is None
        assert fallback(job(settings={"workflow": {"1": {"class_type": "SaveImage"}}})) is None
        # Without ROUTE_IMAGE the default order ends in local, but local is no fallback.
        assert fallback(job(), routes={}) is None


def test_one_cooling_comfyui_instance_does_not_cool_the_others(pg_runtime):
    from providers.registry import Registry

    class Instances:
        name = "comfyui"
        content_types = frozenset({"image"})

        def instances(self):
            return ["http://a:8188", "http://b:8188"]

    reg = Registry({"comfyui": Instances()})
    rt = pg_runtime
    for _ in range(circuits.THRESHOLD):
        circuits.record_failure(rt.engine, circuits.instance_key("comfyui", "http://a:8188"))
    with rt.engine.connect() as conn:
        assert "comfyui" not in routing.cooling_providers(conn, reg)
    for _ in range(circuits.THRESHOLD):
        circuits.record_failure(rt.engine, circuits.instance_key("comfyui", "http://b:8188"))
    with rt.engine.connect() as conn:
        assert "comfyui" in routing.cooling_providers(conn, reg)
    with rt.engine.begin() as conn:
        conn.execute(provider_circuits.delete().where(
            provider_circuits.c.provider.like("comfyui@%")))
