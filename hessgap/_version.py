"""hessgap's version: the one place it is written (setup.py and CMakeLists.txt read it from here)."""

__version__ = "0.1.0"
