"""ProxyPrompt engine: segment a target volume from an annotated reference case.

The engine never imports slicer, qt or vtk: it is shared by the Slicer module and the CLI.
"""

__version__ = "0.1.0"
