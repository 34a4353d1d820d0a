"""The LLM server replica's own code, in its process: the Serve deployment (llm_server), the served
checkpoint (tokenizer, chat template, EOS ids, generation defaults, fingerprint), and what turns
the engine's tokens into answers: text and stop strings, streamed chunks, tool calls, and the
grammars of structured output. The engine (deployments/engine) runs below it."""
