"""The inference engine: scheduler, block manager, model runner, sampler, detokenizer."""
