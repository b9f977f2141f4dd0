"""sessionlane's messages: wire models, the msgpack codec, error codes, actor envelopes."""
