"""The Qt side of the Slicer module, checked without Qt: every widget the Widget uses exists in the .ui, and every
widget bound to the parameter node names one of its fields."""

import ast
import xml.etree.ElementTree as ElementTree

from conftest import REPO

MODULE = REPO / "SlicerProxyPrompt"


def ui_widgets():
    tree = ElementTree.parse(MODULE / "Resources" / "UI" / "ProxyPrompt.ui")
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    return tree, widgets


def module_tree():
    return ast.parse((MODULE / "ProxyPrompt.py").read_text())


def test_every_widget_the_widget_uses_is_in_the_ui():
    _, widgets = ui_widgets()
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert {"applyButton", "referenceSegmentsTable", "downloadButton", "progressBar"} <= used
    assert used - set(widgets) == set()


def test_parameter_bindings_name_fields_of_the_parameter_node():
    tree, widgets = ui_widgets()
    bound = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = name
    parameter_class = next(node for node in ast.walk(module_tree())
                           if isinstance(node, ast.ClassDef) and node.name == "ProxyPromptParameterNode")
    fields = {item.target.id for item in parameter_class.body if isinstance(item, ast.AnnAssign)}
    assert set(bound) == fields  # every field has a widget and every binding a field
    # the widgets: inputs, output (new or existing), generator + description, model + download, device,
    # advanced options (slice axis, image size, several references), dependencies and weights cache
    for name in ("referenceVolumeSelector", "referenceSegmentationSelector", "referenceSegmentsTable",
                 "targetVolumeSelector", "outputSegmentationSelector", "generatorComboBox", "generatorDescriptionLabel",
                 "modelComboBox", "modelStatusLabel", "downloadButton", "downloadProgressBar", "deviceComboBox",
                 "sliceAxisComboBox", "imageSizeSpinBox", "extraReferenceVolumeSelector",
                 "installDependenciesButton", "showCacheButton", "clearCacheButton", "applyButton"):
        assert name in widgets, name


def test_nothing_is_installed_or_downloaded_at_import_or_in_constructors():
    tree = module_tree()
    top_level_calls = [node for statement in tree.body if not isinstance(statement, (ast.ClassDef, ast.FunctionDef))
                       for node in ast.walk(statement) if isinstance(node, ast.Call)]
    names = {ast.unparse(call.func) for call in top_level_calls}
    assert not any("pip" in name or "download" in name or "install" in name.lower() for name in names), names
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("__init__", "setup"):
            called = {ast.unparse(call.func) for call in ast.walk(node) if isinstance(call, ast.Call)}
            assert not any("pip" in name or "download_model" in name or "installTorch" in name for name in called)


def test_the_self_test_runs_on_the_mrml_core(monkeypatch):
    """ProxyPromptTest (the self-test real Slicer runs) on slicer-core, with Qt and the ScriptedLoadableModule base
    classes replaced by minimal stand-ins; model 'none' keeps it quick (in Slicer it uses SAM 2 / random weights)."""
    import sys
    import types
    import unittest

    import pytest

    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    monkeypatch.syspath_prepend(str(REPO.parent / "shared" / "slicer-headless"))
    monkeypatch.syspath_prepend(str(MODULE))
    import slicer_env

    slicer_env.setup()
    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    base.ScriptedLoadableModule = base.ScriptedLoadableModuleWidget = type("Stand-in", (), {})
    base.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    base.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    for name, module in {"slicer.ScriptedLoadableModule": base, "slicer.parameterNodeWrapper": wrapper,
                         "qt": types.ModuleType("qt"), "ctk": types.ModuleType("ctk")}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "ProxyPrompt", raising=False)
    import ProxyPrompt

    monkeypatch.setattr(ProxyPrompt.ProxyPromptTest, "model", "none")
    result = unittest.TextTestRunner(verbosity=0).run(ProxyPrompt.ProxyPromptTest("runTest"))
    assert result.wasSuccessful(), result.failures + result.errors
