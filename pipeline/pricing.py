"""Turns usage (in each provider's units) into credits, from the providers price table."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

from sqlalchemy import select

from pipeline.errors import PipelineError, ValidationFailed
from pipeline.tables import providers

_MICRO = Decimal("0.000001")


class UnpricedUsage(PipelineError):
    code = "UNPRICED_USAGE"

    def __init__(self, provider: str, content_type: str, units: list[str]):
        super().__init__(
            f"No price for {', '.join(units)} of {provider} {content_type}; "
            "add it to the providers table.",
            details={"provider": provider, "contentType": content_type, "units": units},
        )


class PriceTable:
    """Prices in credits per unit: {provider: {content_type: {unit: price}}}."""

    def __init__(self, prices: dict[str, dict[str, dict[str, str]]]):
        self._prices = {
            provider: {
                ctype: {unit: Decimal(str(price)) for unit, price in units.items()}
                for ctype, units in by_type.items()
            }
            for provider, by_type in prices.items()
        }

    @classmethod
    def from_db(cls, conn) -> PriceTable:
        rows = conn.execute(select(providers.c.name, providers.c.pricing)).all()
        return cls({row.name: row.pricing for row in rows})

    def offers(self, provider: str, content_type: str) -> bool:
        return content_type in self._prices.get(provider, {})

    def cost(self, provider: str, content_type: str, usage: dict[str, float]) -> Decimal:
        """Sum of units x price, rounded up to the micro-credit.

        A unit the table does not price is an error, never free: a silent zero would
        give work away. tests/providers/test_saas_prices.py keeps the table complete.
        """
        try:
            units = self._prices[provider][content_type]
        except KeyError:
            raise ValidationFailed(
                f"Provider '{provider}' has no price for {content_type}.",
                details={"provider": provider, "contentType": content_type},
            ) from None
        unpriced = sorted(set(usage) - set(units))
        if unpriced:
            raise UnpricedUsage(provider, content_type, unpriced)
        negative = sorted(unit for unit, amount in usage.items() if Decimal(str(amount)) < 0)
        if negative or any(units[unit] < 0 for unit in usage):
            # A provider reporting negative usage (or a negative price) would mint credits.
            raise PipelineError(f"Negative usage or price for {provider} {content_type}.",
                                details={"units": negative or sorted(usage)},
                                code="INVALID_USAGE")
        total = sum(
            (Decimal(str(amount)) * units[unit] for unit, amount in usage.items()),
            Decimal(0),
        )
        return total.quantize(_MICRO, rounding=ROUND_CEILING)
