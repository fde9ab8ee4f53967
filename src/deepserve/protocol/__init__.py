"""The OpenAI protocol as deepserve speaks it, shared by its three front doors (the
server, the gateway and the Ray Serve ingress): strict request models (``models``),
and the HTTP pieces (``http``): error bodies, SSE error events, bearer keys, the body
limit and key check, the model list. Torch-free, so the gateway loads no engine."""
