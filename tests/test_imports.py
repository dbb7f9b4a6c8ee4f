"""``import revtree`` stays light: no adapter targets, no test or plotting tools."""

import subprocess
import sys


def test_import_revtree_imports_no_optional_package():
    code = (
        "import sys, revtree, revtree.codecs\n"
        "heavy = {'equiformer_pytorch', 'reformer_pytorch', 'hypothesis', 'matplotlib',"
        " 'revtree.adapters'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
