"""Triton kernels, installed as hkd.kernels. Importing them needs triton; the rest of hkd does not.

On a machine without a GPU they run under the Triton interpreter: set TRITON_INTERPRET=1 before hkd
is imported (hkd loads torch._dynamo, which imports triton.language; its functions are made for the
interpreter or for the GPU then, once).
"""
