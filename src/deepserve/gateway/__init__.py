"""The gateway: an OpenAI-compatible proxy that routes between model tiers."""
