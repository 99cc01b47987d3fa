"""What a newcomer sees in the protocol forms and tree: short tree labels (no "scipion_gmmh..."),
"import poses" under Imports, no tab empty at the Normal level, every -1 default explained,
help on every visible parameter, one threads default, and GPU help/default/validation that
match what the code does."""
from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest

pyworkflow = pytest.importorskip("pyworkflow")
if not pyworkflow.Config.SCIPION_DOMAIN:
    pyworkflow.Config.setDomain("pwem")

import scipion_gmmhet.protocols as protocols  # noqa: E402
from scipion_gmmhet.protocols import gpu  # noqa: E402

CLASSES = ["ProtGmmhetImportPoses", "ProtGmmhetBuildGmm", "ProtGmmhetTrain", "ProtGmmhetCluster",
           "ProtGmmhetRefine"]
CONF = Path(protocols.__file__).resolve().parents[1] / "protocols.conf"
README_TEXT = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _items(nodes):
    for n in nodes:
        yield n
        yield from _items(n.get("children", []))


def test_tree_labels_are_short_and_import_is_under_imports():
    cp = configparser.ConfigParser()
    cp.optionxform = str
    cp.read(CONF)
    for view in ("Protocols SPA", "Flexibility Hub"):
        tree = json.loads(cp["PROTOCOLS"][view])
        prots = [n for n in _items(tree) if n["tag"] == "protocol"]
        assert {n["value"] for n in prots} == set(CLASSES)
        for n in prots:
            # the tree's default column shows about 22 characters
            assert n["text"].startswith("gmmhet - ") and len(n["text"]) <= 22, n
            # the README's protocol table gives each menu name next to the form's
            assert n["text"] in README_TEXT, n
    spa = json.loads(cp["PROTOCOLS"]["Protocols SPA"])
    imports = next(n for n in spa if n["text"] == "Imports")
    assert "ProtGmmhetImportPoses" in [n["value"] for n in _items(imports["children"])]


@pytest.mark.parametrize("name", CLASSES)
def test_form_tabs_help_and_defaults(name):
    prot = getattr(protocols, name)()
    for section in prot._definition.iterSections():
        params = list(section.iterParams())
        normal = [n for n, p in params if p.expertLevel.get() == 0]
        assert normal, "%s: tab '%s' is empty at the Normal level" % (name, section.label.get())
        for pname, p in params:
            if section.label.get() in ("General", "Parallelization") or not hasattr(p, "help"):
                continue
            help_ = p.help.get() or ""
            cls = type(p).__name__
            if cls not in ("LabelParam", "Group", "Line"):
                assert help_.strip(), "%s.%s has no help" % (name, pname)
            default = p.default.get() if hasattr(p, "default") else None
            if str(default) in ("-1", "-1.0"):
                assert "-1" in help_ and "automatic" in help_, "%s.%s: -1 unexplained" % (name, pname)
    if prot.allowThreads:
        assert prot.numberOfThreads.get() == 4, name


@pytest.mark.parametrize("name", ["ProtGmmhetBuildGmm", "ProtGmmhetTrain", "ProtGmmhetCluster",
                                  "ProtGmmhetRefine"])
def test_gpu_default_and_validation_follow_the_machine(name, monkeypatch):
    prot = getattr(protocols, name)()
    assert bool(prot.useGpu.get()) == gpu.cudaAvailable()
    prot.useGpu.set(True)
    monkeypatch.setattr(gpu, "cudaAvailable", lambda: False)
    errors = gpu.gpuErrors(prot)
    assert len(errors) == 1 and '"Use GPU?" to No' in errors[0] and "--device" not in errors[0]
    prot.useGpu.set(False)
    assert gpu.gpuErrors(prot) == []


def test_train_gpu_help_says_one_process_per_gpu():
    prot = protocols.ProtGmmhetTrain()
    help_ = prot.getParam("gpuList").help.get()
    assert "first one listed" not in help_ and "per GPU" in help_


@pytest.mark.parametrize("name", CLASSES)
def test_class_label_reads_gmmhet_not_the_package(name):
    """New runs are titled, and the tree's "default" entries read, "gmmhet - ..."."""
    cls = getattr(protocols, name)
    assert cls.getClassLabel().startswith("gmmhet - ")
    assert "scipion_gmmhet" not in cls.getClassLabel()
    assert cls.getClassLabel(prependPackageName=False) == cls._label
