import subprocess
import sys

HEAVY = ("coremltools", "onnxruntime", "torch_pruning", "accelerate")


def test_import_toolchain_stays_light():
    code = (
        "import sys, toolchain, toolchain.cli, toolchain.config, toolchain.pipeline, toolchain.artifact; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
