"""
The tutorial's assignments, as stubs for you to fill in. Each module defines the functions of
one assignment (the one a plug-in point calls, and its partner: recurrent_step for linear
attention, dequantize for a quantizer); plug yours in with one flag and check it with
`python -m exercises.check NAME` (see exercises/README.md).
"""
