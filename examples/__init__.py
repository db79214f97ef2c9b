"""Example applications built on the outbox (run ``make demo``)."""
