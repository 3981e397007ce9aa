"""Model families other than SmolLM2: tiny random Llama, Qwen2, Mistral, Gemma 2 and Phi-3 models,
each with its family's real chat template (tests/data/chat_templates) and special tokens added to
a copy of SmolLM2's tokenizer, built once per session. For each: the gateway serves the prompt the
trainer trains on, the loss covers the answer and the family's end of turn only, generation stops
at that end of turn, LoRA finds the family's linear layers and its saved adapter loads back in
PEFT, a template without a system turn gets the notes in the first user turn, a long item is cut
from its oldest turns and keeps its answer, and the loss matches the model's own logits (Gemma 2's
soft-capping included)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flywheel.prompt import PromptSettings, build_messages, chat_format, render, with_notes
from trainer.batching import collate
from trainer.encode import IGNORE, encode_example, encode_rows, model_limit
from trainer.generate import generate_answers
from trainer.modeling import add_lora, answer_loss
from trainer.settings import TrainerSettings, bot_context_tokens
from trainer.train import save_adapter

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # the transformers Config class
    template: str  # file in tests/data/chat_templates
    tokens: dict  # bos/eos/pad and the family's other special tokens
    end_of_turn: str  # what the template writes after an answer, up to its special token
    system_turn: bool  # the template renders a system turn
    config_kwargs: dict


FAMILIES = [
    Family("llama", "LlamaConfig", "llama3.jinja",
           {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
           "<|eot_id|>", True, {}),
    Family("qwen2", "Qwen2Config", "qwen2.jinja",
           {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
           "<|im_end|>", True, {}),
    Family("mistral", "MistralConfig", "mistral.jinja",
           {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
            "additional_special_tokens": ["[INST]", "[/INST]"]},
           "</s>", False, {"sliding_window": None}),
    # Logits of a few units and a small cap, so that capping changes the loss visibly.
    Family("gemma2", "Gemma2Config", "gemma2.jinja",
           {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
           "<end_of_turn>", False,
           {"final_logit_softcapping": 2.0, "initializer_range": 0.2, "query_pre_attn_scalar": 64,
            "sliding_window": 512}),
    Family("phi3", "Phi3Config", "phi3.jinja",
           {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
           "<|end|>", False, {"original_max_position_embeddings": 2048}),
]
MESSAGES = [{"role": "system", "content": "You answer questions about Lumenfold."},
            {"role": "user", "content": "Who runs the Oslo office?"}]
ANSWER = "Marta Lind."


def _build(family: Family, target: Path, tokenizer_source: Path) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.add_special_tokens(family.tokens)
    if "bos_token" not in family.tokens:
        tokenizer.bos_token = None
    tokenizer.chat_template = (TEMPLATES / family.template).read_text()
    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **family.config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session", params=FAMILIES, ids=lambda f: f.name)
def family(request, tmp_path_factory, tiny_model_dir):
    """(Family, model dir), each family built once per session."""
    fam = request.param
    return fam, _build(fam, tmp_path_factory.mktemp(f"family-{fam.name}"), tiny_model_dir)


@pytest.fixture(scope="session")
def loaded(family):
    """The family's (Family, dir, tokenizer, float32 model) as the trainer loads them."""
    from trainer.modeling import load_base_model, load_tokenizer

    fam, path = family
    return fam, path, load_tokenizer(path), load_base_model(path, torch.device("cpu")).eval()


class Scripted:
    """A forward hook on the LM head that makes the model say `script`, one token a step, then
    repeat its last token: a random model's greedy output, made predictable."""

    def __init__(self, model, script: list[int]) -> None:
        self.script, self.step = script, 0
        self.handle = model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, args, output):
        token = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        forced = torch.full_like(output, -1e4)
        forced[..., token] = 1e4
        return forced

    def remove(self) -> None:
        self.handle.remove()


def _script(tokenizer, fam: Family) -> list[int]:
    """'Hello there', the end of turn, then text that must never be reached."""
    words = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(fam.end_of_turn)
    return [*words, end, *tokenizer(" LEAKED", add_special_tokens=False)["input_ids"]]


def _backend(path: Path):
    from gateway.backends.transformers import TransformersBackend
    from gateway.settings import GatewaySettings

    backend = TransformersBackend(GatewaySettings(base_model=path, device="cpu", generation_nice=0))
    asyncio.run(backend.start())
    return backend


@pytest.fixture(scope="session")
def backend(family):
    fam, path = family
    backend = _backend(path)
    yield fam, backend
    asyncio.run(backend.close())


def test_the_template_is_probed_for_its_system_turn_and_end_of_turn(loaded):
    fam, _, tok, _ = loaded
    fmt = chat_format(tok)
    assert (fmt.system_turn, fmt.end_of_turn) == (fam.system_turn, fam.end_of_turn)
    assert fmt.stop_ids[0] == tok.convert_tokens_to_ids(fam.end_of_turn) and tok.eos_token_id in fmt.stop_ids


def test_the_gateway_serves_the_prompt_the_trainer_trains_on(backend, loaded):
    from gateway.schemas import ChatCompletionRequest

    _, gateway = backend
    _, _, tok, _ = loaded
    messages = with_notes(MESSAGES, [("Where is lunch?", "In the atrium.")])
    req = ChatCompletionRequest(model="base", messages=messages, temperature=0)
    text, ids, _, _ = gateway._prepare("chat", req, None)
    enc = encode_example(tok, messages, ANSWER)
    prompt = [t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE]
    assert ids["input_ids"][0].tolist() == prompt and text == render(tok, messages)
    assert "In the atrium." in text and "Who runs the Oslo office?" in text


def test_the_loss_covers_the_answer_and_its_end_of_turn_only(loaded):
    fam, _, tok, _ = loaded
    enc = encode_example(tok, MESSAGES, ANSWER)
    targets = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(targets) == ANSWER + fam.end_of_turn
    assert targets[-1] == tok.convert_tokens_to_ids(fam.end_of_turn)
    assert enc.labels[:len(enc) - len(targets)] == [IGNORE] * (len(enc) - len(targets))


def test_evaluation_stops_at_the_end_of_turn(loaded):
    fam, _, tok, model = loaded
    scripted = Scripted(model, _script(tok, fam))
    try:
        answers = generate_answers(model, tok, [MESSAGES, MESSAGES[1:]], device=torch.device("cpu"),
                                   max_new_tokens=12)
    finally:
        scripted.remove()
    assert answers == ["Hello there", "Hello there"]


def test_the_gateway_stops_at_the_end_of_turn(backend, loaded):
    from gateway.schemas import ChatCompletionRequest

    fam, gateway = backend
    _, _, tok, _ = loaded
    scripted = Scripted(gateway.model, _script(tok, fam))
    try:
        req = ChatCompletionRequest(model="base", messages=MESSAGES, temperature=0, max_tokens=12)
        out = asyncio.run(gateway.generate(None, "chat", req))
    finally:
        scripted.remove()
    choice = out["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Hello there", "stop")
    words = tok("Hello there", add_special_tokens=False)["input_ids"]
    assert out["usage"]["completion_tokens"] == len(words) + 1  # the words and the end of turn


def test_lora_finds_the_linear_layers_and_the_adapter_loads_back(family, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    fam, path = family
    settings = TrainerSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(path), settings)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    fused = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    split = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert wrapped == (fused if fam.name == "phi3" else split)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)  # a trained adapter: B is no longer zero
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = again(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("notes", [[], [("Where is lunch?", "In the atrium.")]])
def test_a_template_without_a_system_turn_gets_it_in_the_first_user_turn(loaded, notes):
    fam, _, tok, _ = loaded
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Who runs the Oslo office?"}]
    messages = with_notes(build_messages(history, PromptSettings(system_prompt="Be brief.")), notes)
    text = render(tok, messages)
    system = messages[0]["content"]
    assert system in text and text.count("Who runs the Oslo office?") == 1
    if not fam.system_turn:  # the system text opens the first user turn, before its own words
        assert text.index(system) < text.index("Hi") < text.index("Hello!") < text.index("Who runs")
        assert f"{system}\n\nHi" in text


def test_a_long_item_loses_its_oldest_turns_never_its_answer(loaded):
    fam, _, tok, _ = loaded
    old = [m for i in range(12) for m in ({"role": "user", "content": f"Old question {i} about the weather?"},
                                          {"role": "assistant", "content": f"Old answer {i}: it rains."})]
    question = {"role": "user", "content": "Who runs the Oslo office?"}
    row = {"messages": [MESSAGES[0], *old, question], "answer": ANSWER}
    whole = encode_example(tok, row["messages"], ANSWER)
    short = encode_example(tok, [MESSAGES[0], question], ANSWER)
    limit = (len(whole) + len(short)) // 2
    (enc,), dropped = encode_rows(tok, [row], limit)
    assert dropped == 0 and len(short) < len(enc) <= limit
    text = tok.decode(enc.input_ids)
    assert "Lumenfold" in text and "Who runs the Oslo office?" in text and "Old answer 11" in text
    assert "Old question 0 " not in text
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == ANSWER + fam.end_of_turn
    # only the system prompt, the question and the answer: dropped when even they do not fit
    assert encode_rows(tok, [row], len(short))[1] == 0
    assert encode_rows(tok, [row], len(short) - 1) == ([], 1)


def test_the_loss_matches_the_models_own_logits(loaded):
    fam, _, tok, model = loaded
    batch = collate([encode_example(tok, MESSAGES, ANSWER), encode_example(tok, MESSAGES[1:], "Nobody.")],
                    tok.pad_token_id)
    with torch.no_grad():
        ours, n = answer_loss(model, batch, reduction="mean")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        theirs = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                 ignore_index=IGNORE)
    assert n == int((targets != IGNORE).sum())
    assert torch.allclose(ours, theirs, atol=1e-5), (float(ours), float(theirs))
    if fam.name == "gemma2":  # the cap matters here: without it the loss is another one
        cap = model.config.final_logit_softcapping
        model.config.final_logit_softcapping = None
        try:
            with torch.no_grad():
                uncapped, _ = answer_loss(model, batch, reduction="mean")
        finally:
            model.config.final_logit_softcapping = cap
        assert abs(float(uncapped) - float(theirs)) > 0.1, (float(uncapped), float(theirs))


def test_the_default_length_holds_the_bots_context_within_the_models(loaded):
    _, _, tok, _ = loaded
    assert TrainerSettings().max_length == bot_context_tokens(PromptSettings()) == 2256
    assert TrainerSettings(max_length=300).max_length == 300
    assert model_limit(tok, 2256) == 2048 == tok.model_max_length and model_limit(tok, 300) == 300
