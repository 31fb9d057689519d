"""The policy: Seg-Zero's prompt and the tiny embedded Qwen2.5-VL used by the default run and tests."""
