"""The package's layers (docs/architecture.md): a module imports only from its own layer or the ones below,
at module level and inside functions alike, so the library never runs back up into the commands."""

import ast

from conftest import ROOT

LAYERS = {  # docs/architecture.md's table; a new module gets a row here and there
    1: ["errors", "world", "jsonl", "paths", "ops"],
    2: [
        "model_config",
        "train_config",
        "schedule",
        "ds_config",
        "ds_config_checks",
        "ds_config_optimizer",
        "run_spec",
        "cli_args",
    ],
    3.0: ["tokenizer"],
    3.5: ["data", "sft_data"],
    4: ["model", "pipeline", "tensor_parallel", "sequence_parallel", "experts", "metrics", "scoring", "hf_layout"],
    5: ["checkpoint", "model_dir", "safe_load"],
    6: ["optimizer", "engine", "loop", "run_control", "seq_len_warmup", "batch_warmup"],
    7: ["pretrain", "continued", "cooldown", "finetune", "classify", "tuning", "preference", "reward_model"],
    8: [
        "cli",
        "__main__",
        "evaluation",
        "tasks",
        "generate",
        "export",
        "hf_import",
        "consolidate",
        "report",
        "plan",
        "plan_layouts",
        "preflight",
        "supervise",
    ],
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def top(module: str) -> str:
    """dsllm.data.prepare -> data; dsllm.model -> model."""
    return module.split(".")[1] if module.count(".") else ""


def test_every_module_has_a_layer_and_imports_only_downward():
    package = ROOT / "dsllm"
    found = {p.stem if p.parent == package else p.relative_to(package).parts[0] for p in package.rglob("*.py")}
    assert found - {"__init__"} == set(LAYER_OF), "a module without a layer (or a layer without its module)"
    upward = []
    for path in sorted(package.rglob("*.py")):
        name = "dsllm." + ".".join(path.relative_to(package).with_suffix("").parts)
        own = top(name) if top(name) not in ("", "__init__") else None
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsllm."):
                targets = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.module == "dsllm":
                targets = [f"dsllm.{alias.name}" for alias in node.names if alias.name != "__version__"]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("dsllm.")]
            for target in targets:
                if LAYER_OF[top(target)] > LAYER_OF[own]:
                    upward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [name for name in LAYER_OF if name != "__main__" and f"`{name}" not in page]
    assert not missing, f"docs/architecture.md does not name {missing}"
