"""The commands and snippets of the READMEs run as written.

Fenced blocks are extracted from README.md and the per-folder READMEs. A command or snippet that
uses only the bundled models (tiny-cogvlm, tiny-cogagent) or no model is run; one that needs
released weights cannot run here, so its script must exist and its flags must parse with the
script's own parser (the script runs until its parse_args, which then stops it): a renamed or
removed flag fails. Relative links between the documents must point at files that exist.
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "basic_demo/README.md", "openai_demo/README.md", "evaluation/README.md",
        "finetune_demo/README.md", "composite_demo/README.md", "assets/checkpoints/README.md",
        "bench/RESULTS.md", "bench/HISTORY.md"]
BUNDLED = ("tiny-cogvlm", "tiny-cogagent", "build/tiny-cogvlm-hf")
LAUNCHER_FLAGS = {"--standalone", "--nnodes=1", "--nproc-per-node", "--nproc-per-node=2",
                  "--nproc-per-node=4", "--nproc-per-node=8"}


def blocks(doc: str, lang: str) -> list[str]:
    text = (ROOT / doc).read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """Shell lines of a bash block: continuations joined, comments and blank lines dropped."""
    out = []
    for line in re.sub(r"\\\n\s*", "", block).splitlines():
        code = line.split("  #")[0].strip()
        if code and not code.startswith("#"):
            out.append(code)
    return out


def inline_commands(doc: str) -> list[str]:
    """Commands quoted inline (the task tables): `python ...`, `torchrun ...`, `streamlit ...`;
    not the benchmark documents' templates (`--model M [--compile]`) nor elided ones (`...`)."""
    if doc.startswith("bench/"):
        return []
    found = re.findall(r"`((?:python|torchrun|streamlit|MODEL=\S+ bash) [^`]+)`", (ROOT / doc).read_text())
    found = [" ".join(c.split()) for c in found]
    return [c for c in found if "..." not in c and re.search(r"\.(py|sh)\b", c)]


def all_commands(docs=DOCS) -> list[tuple[str, str]]:
    return [(doc, c) for doc in docs for b in blocks(doc, "bash") for c in commands(b)]


def quoted_commands(docs=DOCS) -> list[tuple[str, str]]:
    return [(doc, c) for doc in docs for c in inline_commands(doc)]


def runs_here(cmd: str) -> bool:
    """Uses a bundled model (or none) and is not a server, a launcher or a multi-GPU run."""
    words = shlex.split(cmd.replace("&&", ";"))
    if cmd.rstrip().endswith("&") or words[0] in ("torchrun", "streamlit", "S=") or "web_demo.py" in cmd:
        return False
    if "--from_pretrained" in words or "--src" in words or "MODEL=" in cmd:
        names = [w for i, w in enumerate(words) if i and words[i - 1] in ("--from_pretrained", "--src")]
        return bool(names) and all(n.endswith(BUNDLED) for n in names) and "MODEL=" not in cmd
    return cmd.startswith("make demo") or "synthetic.py" in cmd


class Parsed(Exception):
    pass


def check_flags(script: Path, argv: list[str], monkeypatch) -> None:
    """Run `script` with `argv` until its parser has parsed them: an unknown flag exits 2."""
    def stop(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        raise Parsed(ns)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(sys, "argv", [str(script)] + argv)
    with pytest.raises(SystemExit if "--help" in argv else Parsed) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert "--help" not in argv or e.value.code == 0


def script_and_args(cmd: str) -> tuple[Path, list[str]]:
    """The Python script a command line runs and the arguments it passes to it."""
    words = [w for w in shlex.split(cmd.rstrip(" &")) if not re.match(r"^[A-Z_]+=", w)]
    if words[0] == "torchrun":
        words = [w for w in words[1:] if w not in LAUNCHER_FLAGS and not w.isdigit()]
    elif words[0] == "streamlit":                    # streamlit run SCRIPT [streamlit flags] -- ARGS
        rest = words[words.index("--") + 1:] if "--" in words else []
        return ROOT / "composite_demo" / "registry.py", rest
    elif words[0] == "bash":                         # the launchers pass their extra arguments on
        sh = ROOT / words[1]
        assert sh.is_file(), sh
        demo = sh.name.replace("_lora.sh", "_demo.py").replace("evaluate_", "finetune_").replace(".sh", "_demo.py")
        return ROOT / "finetune_demo" / demo, ["--from_pretrained", "x"] + words[2:]
    else:
        words = words[1:]                            # python
    return ROOT / words[0], words[1:]


NOT_RUN = sorted(set([(doc, c) for doc, c in all_commands()
                     if not runs_here(c) and c.split()[0] in ("python", "torchrun", "streamlit", "bash")
                     or re.match(r"^[A-Z_]+=\S+ (bash|streamlit)", c)] + quoted_commands()))


@pytest.mark.parametrize("doc,cmd", NOT_RUN, ids=[f"{d}:{c[:60]}" for d, c in NOT_RUN])
def test_flags_of_commands_that_need_released_weights(doc, cmd, monkeypatch):
    script, argv = script_and_args(cmd.replace("$S", ""))
    assert script.is_file(), f"{doc}: {cmd}: no such script {script}"
    if script.name == "registry.py":                 # composite demo: its own flags after `--`
        from composite_demo.registry import parse
        parse(argv)
        return
    check_flags(script, argv, monkeypatch)


def run(cmd: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="2")
    return subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bundled_model_commands_of_the_readme():
    """README.md's block for the bundled models (and evaluation/README.md's): every line that
    does not start a server runs and succeeds; `make demo` draws its boxes."""
    cmds = list(dict.fromkeys(c for _, c in all_commands(["README.md", "evaluation/README.md"]) if runs_here(c)))
    assert any(c.startswith("make demo") for c in cmds) and any("cli_demo_hf.py" in c for c in cmds)
    shutil.rmtree(ROOT / "build" / "eval-demo", ignore_errors=True)   # as on a first run: synthetic.py never overwrites
    for c in cmds:
        r = run(c)
        assert r.returncode == 0, f"{c}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert r.stdout.strip(), c


def test_openai_client_without_a_server_says_how_to_start_one():
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run(f"python openai_demo/openai_api_request.py --base_url http://127.0.0.1:{port}/v1 "
            f"--image assets/scene.png", timeout=60)
    assert r.returncode == 1
    assert f"http://127.0.0.1:{port}/v1" in r.stderr and "openai_demo/openai_api.py --from_pretrained" in r.stderr
    assert "Traceback" not in r.stderr


def test_library_snippets_run():
    """The Python snippets that use a bundled model (README.md's library use, basic_demo's HF
    front end after its conversion) run as written."""
    snippets = [b for doc in ("README.md", "basic_demo/README.md") for b in blocks(doc, "python")
                if any(n in b for n in BUNDLED)]
    assert len(snippets) == 2
    if not (ROOT / "build" / "tiny-cogvlm-hf" / "config.json").is_file():
        assert run("python utils/convert_checkpoint.py sat2hf --src tiny-cogvlm --dst build/tiny-cogvlm-hf "
                   "--overwrite").returncode == 0
    for code in snippets:
        r = run(f"python - <<'EOF'\n{code}\nEOF")
        assert r.returncode == 0, f"{code}\n{r.stderr[-3000:]}"
        assert r.stdout.strip(), code


def anchors(path: Path) -> set:
    """GitHub's ids of a markdown file's headings."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)     # not the code's comments
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_links_between_documents_exist():
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", (ROOT / doc).read_text()):
            if target.startswith("http"):
                continue
            path = (ROOT / doc).parent / target if target else ROOT / doc
            assert path.exists(), f"{doc}: broken link {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{doc}: no heading #{anchor} in {target or doc}"


def test_readme_stays_an_overview():
    readme = (ROOT / "README.md").read_text()
    assert "| status |" not in readme and len(readme.splitlines()) < 260
