"""The extension's packaging files agree with each other and with the module folder."""

import json
import re
import struct

from conftest import REPO

MODULE = REPO / "SlicerProxyPrompt"


def cmake_set(text, name):
    """Values of `set(NAME ...)` in a CMake file (quoted strings or whitespace-separated words)."""
    match = re.search(r"set\(\s*" + re.escape(name) + r"\s+(.*?)\)", text, re.S)
    assert match, f"set({name} ...) not found"
    body = re.sub(r"#[^\n]*", "", match.group(1))
    return [quoted or word for quoted, word in re.findall(r'"([^"]*)"|(\S+)', body)]


def s4ext():
    entries = {}
    for line in (REPO / "ProxyPrompt.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    return entries


def test_extension_name_category_and_dependencies_agree():
    top = (REPO / "CMakeLists.txt").read_text()
    project = re.search(r"project\((\w+)\)", top).group(1)
    catalog_path = REPO / f"{project}.json"  # the catalog entry is named after the project
    assert catalog_path.is_file()
    catalog = json.loads(catalog_path.read_text())
    assert "catalog-entry-schema-v1.0.2.json" in catalog["$schema"]
    assert set(catalog) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                            "scm_type", "scm_url", "enabled", "tier"}  # the schema allows no other keys
    depends = cmake_set(top, "EXTENSION_DEPENDS")
    assert depends == ["PyTorch"]
    assert catalog["build_dependencies"] == depends
    assert s4ext()["depends"].split() == depends
    category = cmake_set(top, "EXTENSION_CATEGORY")[0]
    assert catalog["category"] == s4ext()["category"] == category == "Segmentation"
    assert catalog["scm_url"] == s4ext()["scmurl"]
    assert "add_subdirectory(SlicerProxyPrompt)" in top
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                 "EXTENSION_SCREENSHOTURLS"):
        assert cmake_set(top, name)[0]


def test_every_module_file_is_listed_and_every_listed_file_exists():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    name = cmake_set(text, "MODULE_NAME")[0]
    assert name == "ProxyPrompt"
    scripts = [s.replace("${MODULE_NAME}", name) for s in cmake_set(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", name) for s in cmake_set(text, "MODULE_PYTHON_RESOURCES")]
    for listed in scripts + resources:
        assert (MODULE / listed).is_file(), f"{listed} is listed but does not exist"
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk - set(scripts) == set(), "module files missing from MODULE_PYTHON_SCRIPTS"
    assert {"Resources/Icons/ProxyPrompt.png", "Resources/UI/ProxyPrompt.ui"} <= set(resources)
    assert (REPO / "Resources" / "requirements.txt").is_file()


def test_icon_is_a_128_pixel_png_and_the_screenshot_is_committed():
    header = (MODULE / "Resources" / "Icons" / "ProxyPrompt.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)
    screenshot_url = cmake_set((REPO / "CMakeLists.txt").read_text(), "EXTENSION_SCREENSHOTURLS")[0]
    screenshot = REPO / screenshot_url.split("/main/", 1)[1]
    if screenshot.is_file():
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert screenshot.stat().st_size < 300_000
