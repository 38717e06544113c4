"""Scripts and deployment hardening (issue 12): finetune_lora.py resumes for real, the server says why a folder is not
servable, bench_adaptive.py refuses bad options in one line, bench_long_context.py --only_end_to_end and train.py
--train_file follow the output-folder rule, and the batching server refuses sampling it cannot apply."""

import pytest
import torch
from conftest import run_script
from deploy_helpers import save_tiny_model, tiny_adaptive_config
from safetensors.torch import load_file
from test_deploy_serving import _call_middleware

from lightarch import AdaptiveDepthForCausalLM

TARGETS = ["attention", "shared_experts"]  # small; routed-expert LoRA (target_parameters) is test_deploy_peft's
MICRO_LORA = ("--block_size", "32", "--batch_size", "4", "--r", "4", "--save_steps", "2",
              "--targets", ",".join(TARGETS))


def usage_error(result, script: str) -> str:
    """The one stderr line of an argparse usage error (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{script}.py: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 4-step LoRA run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_model(root / "base", router_mode="top_p", num_shared_experts=1)
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    out = root / "first"
    result = run_script("finetune_lora", "--model_dir", str(base), "--text_file", str(text), "--output_dir", str(out),
                        "--max_steps", "4", *MICRO_LORA, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, base, text, out


def test_finetune_lora_resume_continues_the_checkpoint_exactly(lora_run):
    root, base, text, first = lora_run
    assert (first / "checkpoint-2" / "optimizer.pt").is_file() and (first / "checkpoint-4").is_dir()
    final = load_file(first / "adapter_model.safetensors")
    resumed_dir = root / "resumed"
    result = run_script("finetune_lora", "--model_dir", str(base), "--text_file", str(text), "--output_dir",
                        str(resumed_dir), "--max_steps", "4", *MICRO_LORA, "--resume_from_checkpoint",
                        str(first / "checkpoint-2"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_file(resumed_dir / "adapter_model.safetensors")
    assert resumed.keys() == final.keys()
    for key, value in final.items():  # steps 3-4 from the checkpoint's adapter and optimizer == the uninterrupted run
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)


def test_finetune_lora_resume_from_a_missing_path_or_another_adapter_is_refused(lora_run, tmp_path):
    from lightarch.deploy.peft import check_finetune_options, check_resume_adapter, lora_config

    root, base, text, first = lora_run
    missing = tmp_path / "no" / "checkpoint-9"
    options = dict(model_dir=base, text_file=None, merge=False, qlora=False, heldout_fraction=0.1, r=4, block_size=32,
                   batch_size=4, max_steps=4, output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=rf"^--resume_from_checkpoint {missing}: not a complete Trainer checkpoint"):
        check_finetune_options(**options, resume_from_checkpoint=str(missing))  # the script's usage error
    checkpoint = first / "checkpoint-2"
    assert check_finetune_options(**options, resume_from_checkpoint=str(checkpoint)) == str(checkpoint)
    with pytest.raises(ValueError, match=rf"^--resume_from_checkpoint {checkpoint} trained another adapter: r=8 "
                                         r"\(checkpoint: 4\)"):
        check_resume_adapter(lora_config(TARGETS, r=8), checkpoint)
    check_resume_adapter(lora_config(TARGETS, r=4), checkpoint)  # the same adapter: accepted


# -- serving --

def save_adaptive_folder(folder, exit_policy: str):
    from lightarch.data.tokenizers import byte_level_tokenizer

    torch.manual_seed(0)
    model = AdaptiveDepthForCausalLM(tiny_adaptive_config(exit_policy=exit_policy)).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer(model_max_length=model.config.max_position_embeddings).save_pretrained(folder)
    return folder


def test_serve_says_why_an_adaptive_depth_folder_cannot_be_batched_and_serves_what_can(tmp_path):
    from lightarch.deploy.serving import check_servable_folder

    estimator = save_adaptive_folder(tmp_path / "estimator", "estimator")
    with pytest.raises(ValueError, match=r"^--model_dir .*estimator is an adaptive-depth model with "
                                         r"exit_policy='estimator', which continuous batching cannot apply: its "
                                         r"estimator picks one depth per prompt.*--no_continuous_batching"):
        check_servable_folder(estimator)
    confidence = save_adaptive_folder(tmp_path / "confidence", "confidence")
    with pytest.raises(ValueError, match=r"exit_policy='confidence'.*paged cache does not accept"):
        check_servable_folder(confidence)
    config, _ = check_servable_folder(estimator, continuous_batching=False)  # generate() applies any policy
    assert config.model_type == "lightarch_adaptive"
    config, _ = check_servable_folder(save_adaptive_folder(tmp_path / "full", "full"))  # batches like SparseMoe
    assert config.exit_policy == "full"


def _middleware_status(middleware, body):
    """(status, the error payload, or the body the app received) of one chat request."""
    status, error, received = _call_middleware(middleware, "/v1/chat/completions", body)
    return status, error if status != 200 else received


CHAT = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("continuous_batching", [True, False], ids=["batching", "sequential"])
def test_sampling_the_server_would_ignore_is_refused_naming_the_field(continuous_batching):
    from lightarch.data.tokenizers import byte_level_tokenizer
    from lightarch.deploy.serving import TokenBudgetMiddleware

    greedy = TokenBudgetMiddleware(None, byte_level_tokenizer(), budget=64, continuous_batching=continuous_batching)
    for name, value in (("temperature", 0.7), ("top_p", 0.5)):
        status, error = _middleware_status(greedy, {"messages": CHAT, name: value})
        assert status == 400 and error["error"]["param"] == name
        assert error["error"]["message"].startswith(f"{name}={value} asks for sampling, but this server decodes "
                                                    "greedily")
    status, body = _middleware_status(greedy, {"messages": CHAT, "temperature": 0, "top_p": 1})  # greedy: applied
    assert status == 200 and body["temperature"] == 0
    sampling = TokenBudgetMiddleware(None, byte_level_tokenizer(), budget=64, continuous_batching=continuous_batching,
                                     model_samples=True)
    status, answer = _middleware_status(sampling, {"messages": CHAT, "temperature": 0.7})
    if continuous_batching:  # the worker would apply the first request's settings to every request
        assert status == 400 and answer["error"]["param"] == "temperature"
        assert "temperature is not supported with continuous batching" in answer["error"]["message"]
    else:  # each request's own generation config: honoured
        assert status == 200 and answer["temperature"] == 0.7


# -- one-line refusals and the output-folder rule --

def test_bench_adaptive_refusals_are_one_line_usage_errors(tmp_path):
    from lightarch.evaluation.benchmarks.adaptive_depth import check_bench_options

    model = tmp_path / "model"
    model.mkdir()
    (model / "heldout.json").write_text('{"test": {"easy": [], "hard": []}}')
    with pytest.raises(ValueError, match=rf"^--model_dir {model} has no config.json; train it with "):
        check_bench_options(model, output_dir=tmp_path / "out")
    (model / "config.json").write_text('{"model_type": "lightarch_sparse_moe"}')
    with pytest.raises(ValueError, match=r"holds a 'lightarch_sparse_moe' model, not an adaptive-depth one"):
        check_bench_options(model, output_dir=tmp_path / "out")
    (model / "config.json").write_text('{"model_type": "lightarch_adaptive"}')
    (model / "heldout.json").write_text("[]")
    with pytest.raises(ValueError, match=r"heldout.json does not hold the test questions scripts/train_adaptive.py "):
        check_bench_options(model, output_dir=tmp_path / "out")
    (model / "heldout.json").write_text('{"test": {"easy": [], "hard": []}}')
    check_bench_options(model, output_dir=tmp_path / "out")
    # the script: the output-folder refusal was a traceback
    result = run_script("bench_adaptive", "--model_dir", str(model), "--output_dir", str(model), cwd=tmp_path)
    assert usage_error(result, "bench_adaptive") == (
        f"bench_adaptive.py: error: --output_dir {model} is the input --model_dir {model}: writing there would "
        "replace it. Choose another --output_dir.")


def test_bench_long_context_only_end_to_end_follows_the_output_folder_rule(tmp_path):
    from test_long_context_scripts import TINY_BENCH_OVERRIDES

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    micro = ("--only_end_to_end", "--config_overrides", TINY_BENCH_OVERRIDES, "--isolation", "inprocess",
             "--generate_length", "64", "--generate_new_tokens", "2", "--num_threads", "1")
    result = run_script("bench_long_context", *micro, "--output_dir", str(foreign), cwd=tmp_path)
    assert usage_error(result, "bench_long_context") == (
        f"bench_long_context.py: error: --output_dir {foreign} is not empty and holds no output of "
        "bench_long_context.py (no lightarch_output.json): its contents would be replaced. Choose another "
        "--output_dir, or empty it.")
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]


def test_train_file_is_an_input_the_output_folder_may_not_hold(tmp_path):
    previous = tmp_path / "outputs" / "sparse_moe"  # a previous train.py run: replaceable, but it holds the data
    previous.mkdir(parents=True)
    (previous / "lightarch_output.json").write_text('{"script": "train.py", "keep": []}')
    train_file = previous / "train.txt"
    train_file.write_text("def add(a, b):\n    return a + b\n" * 200)
    result = run_script("train", "--train_file", str(train_file), "--output_dir", str(previous), "--max_steps", "1",
                        cwd=tmp_path)
    assert usage_error(result, "train") == (
        f"train.py: error: --output_dir {previous} contains the input --train_file {train_file}: writing there "
        "would replace it. Choose another --output_dir.")
    assert train_file.is_file()
