"""
The tutorial's assignments, as stubs for you to fill in. Each module defines exactly the
function that one of the project's plug-in points calls; plug yours in with one flag and
check it with `python -m exercises.check NAME` (see exercises/README.md).
"""
