"""configs/demo-rl.yaml (issue 26) plans: the after-SFT stages are wired to the demo's, every
input's columns fit, and nothing runs."""
import subprocess
import sys

from conftest import REPO


def test_demo_rl_plans(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "configs/demo-rl.yaml",
                        "--set", f"storage.root={tmp_path / 'root'}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for stage in ("student_samples", "pairs", "student_dpo", "grpo_pool", "grpo_prompts", "student_grpo", "eval_dpo",
                  "eval_grpo"):
        assert stage in p.stdout, p.stdout
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("_manifest.json"))  # nothing ran
