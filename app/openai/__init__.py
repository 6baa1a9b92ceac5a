"""OpenAI-compatible API (/v1): router, wire protocol and serving logic, split as in vLLM."""
