"""One command line: `dsllm VERB` for every command, each verb's --help explaining every option without
loading torch, the old scripts as shims, recipes (a run in one file, options overriding it; the runs they start
and --max-time are in tests/e2e/test_cli_runs.py)."""

import importlib
import json
import subprocess
import sys

import pytest
from conftest import ROOT, assert_user_error
from runs import dsllm, env

from dsllm.cli import VERBS

HEAVY = ("torch", "deepspeed", "transformers", "matplotlib", "datasets", "pyarrow")


def test_dsllm_help_lists_every_verb_and_an_unknown_verb_is_one_line():
    proc = dsllm("--help")
    assert proc.returncode == 0
    for verb, (_, what) in VERBS.items():
        assert f"  {verb} " in proc.stdout and what in proc.stdout
    assert_user_error(dsllm("pretrian"), "unknown verb 'pretrian'", "did you mean 'pretrain'")


def test_every_verb_builds_its_parser_without_torch_and_explains_every_option():
    """--help in under 2 s means no torch (1.5 s to import here, more under load): checked as what got imported."""
    script = (
        "import importlib, json, sys\n"
        "from dsllm.cli import VERBS\n"
        "out = {}\n"
        "for verb, (module, _) in VERBS.items():\n"
        "    parser = importlib.import_module(module).build_parser()\n"
        "    out[verb] = [[a.option_strings, a.help] for a in parser._actions if a.help != '==SUPPRESS==']\n"
        f"print(json.dumps({{'options': out, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["heavy"] == []
    for verb, options in result["options"].items():
        for names, text in options:
            assert text and len(text.split()) >= 2, f"dsllm {verb} {names}: no line of meaning ({text!r})"


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_verbs_help_works(verb):
    proc = dsllm(verb, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    parser = importlib.import_module(VERBS[verb][0]).build_parser()
    for action in parser._actions:
        if action.help != "==SUPPRESS==" and action.option_strings:
            assert action.option_strings[0] in proc.stdout, (verb, action.option_strings)


def test_pretrain_help_shows_meaning_and_defaults():
    text = dsllm("pretrain", "--help").stdout
    assert "--lr FLOAT" in text and "peak learning rate (default: 0.001)" in text
    assert "--max-time" in text and "--recipe FILE" in text and "--model.FIELD VALUE" in text
    assert "--model.n_kv_heads" in text and "key/value heads: None = n_heads (MHA)" in text
    assert "Presets: tiny, gpt2-124m" in text and "auto (bf16 on a GPU that has it, fp32 on CPU), bf16," in text
    assert "--ds_config" in text and "(required)" in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("ds_config: ds_configs/zero2.json\nlearning_rate: 0.1\n", "unknown option 'learning_rate'"),
        ("ds_config: ds_configs/zero2.json\nmax_steps: [1\n", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("ds_config: ds_configs/zero2.json\nmax_steps: 0\n", "--max-steps 0: must be 1 or more"),
        ("ds_config: ds_configs/zero2.json\nmax_time: soon\n", "--max-time soon: not a duration"),
    ],
)
def test_a_bad_recipe_is_one_line(tmp_path, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    assert_user_error(dsllm("pretrain", "--recipe", recipe, timeout=120), message)


SHIPPED = {  # recipe -> data-parallel ranks it is written for
    "default.yaml": 1,
    "gpt2-124m-8xa100.yaml": 8,
    "llama-1.3b-2x8xh100.yaml": 16,
    "llama-7b-2x8x4090.yaml": 16,
}


@pytest.mark.parametrize("name, ranks", SHIPPED.items())
def test_shipped_recipes_resolve_for_their_hardware(name, ranks):
    """Every option known and in range, the model preset and overrides valid, and the batch arithmetic of the
    DeepSpeed JSON adding up on the world size the recipe is written for."""
    from dsllm.cli_args import read_recipe
    from dsllm.ds_config import load_ds_config, resolve_ds_config
    from dsllm.model_config import resolve_model_config
    from dsllm.train_config import TrainConfig

    assert sorted(p.name for p in (ROOT / "launch" / "recipes").glob("*.yaml")) == sorted(SHIPPED)
    values = read_recipe(str(ROOT / "launch" / "recipes" / name), TrainConfig)
    config = TrainConfig(**values)
    model = resolve_model_config(config.model, config.model_overrides)
    ds, batch, precision, _ = resolve_ds_config(
        load_ds_config(ROOT / config.ds_config), config, ranks, config.ds_config, True, True, model.d_model
    )
    assert batch.world_size == ranks and precision == "bf16"
    if config.global_batch_size:
        assert batch.global_size == config.global_batch_size and batch.micro == config.micro_batch_size


def test_the_old_scripts_are_shims_over_the_verbs():
    """launch/, data_pipeline/ and tokenizer/ scripts stay (users and launchers run them by path) and run the verbs."""
    for script, verb in (
        ("launch/pretrain.py", "pretrain"),
        ("launch/finetune.py", "finetune"),
        ("launch/supervise.py", "supervise"),
        ("launch/preflight.py", "preflight"),
        ("data_pipeline/prepare.py", "prepare"),
        ("data_pipeline/validate.py", "validate"),
        ("data_pipeline/merge_shards.py", "merge-shards"),
        ("data_pipeline/default_corpus.py", "default-corpus"),
        ("tokenizer/train_tokenizer.py", "train-tokenizer"),
    ):
        assert f'run_verb("{verb}")' in (ROOT / script).read_text(), script
    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--help"], cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert proc.returncode == 0 and "usage: dsllm pretrain" in proc.stdout


def test_the_command_line_clears_a_recipes_budget_and_turns_off_its_flags():
    """`none` clears an optional value a recipe set, `--no-FLAG` a flag it turned on: the default recipe's CPU budget
    and its decay in the budget give way to a run of steps."""
    from dsllm.errors import UserError
    from dsllm.pretrain import parse_args

    recipe = ("--recipe", str(ROOT / "launch" / "recipes" / "default.yaml"))
    config = parse_args([*recipe])
    assert (config.max_cpu_seconds, config.decay_in_budget, config.max_steps) == (300, True, 2000)
    config = parse_args([*recipe, "--max-cpu-seconds", "none", "--no-decay-in-budget", "--max-steps", "20000"])
    assert (config.max_cpu_seconds, config.decay_in_budget, config.max_steps) == (None, False, 20000)
    with pytest.raises(UserError, match="--decay-in-budget without a budget: pass --max-cpu-seconds or --max-time"):
        parse_args([*recipe, "--max-cpu-seconds", "none"])
    assert parse_args([*recipe, "--max-cpu-seconds", "none", "--max-time", "2h"]).max_seconds == 7200
