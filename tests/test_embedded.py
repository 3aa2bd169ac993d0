"""The embedded SmolLM2-135M-Instruct served through the engine."""

import pytest
from loraplex.server.config import EngineConfig, ModelConfig
from loraplex.server.engine.engine import LLMEngine
from loraplex.server.engine.request import SamplingParams


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model=ModelConfig(quantization="none")))


def chat(engine, question, **params):
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    text, reasons = [], []

    def collect(out):
        text.append(out.new_text)
        if out.finished:
            reasons.append(out.finish_reason)

    engine.add_request(question, prompt, SamplingParams(**params), callback=collect)
    while engine.has_unfinished():
        engine.step()
    return "".join(text), reasons[0]


def test_capital_of_france_is_paris(engine):
    text, reason = chat(engine, "What is the capital of France?", max_tokens=30, temperature=0.0)
    assert "Paris" in text, text
    assert reason == "stop"  # the model ends its turn with <|im_end|> by itself
    assert engine.max_model_len == 8192


def test_stop_string_cuts_the_text(engine):
    text, reason = chat(engine, "What is the capital of France?", max_tokens=30,
                        temperature=0.0, stop=("Paris",))
    assert reason == "stop" and "Paris" not in text and text.startswith("The capital")
