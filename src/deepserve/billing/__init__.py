"""Usage metering, pricing policy, and the cost / profit-margin report."""
