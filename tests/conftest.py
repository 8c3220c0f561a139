import os

# MuJoCo picks its GL back end when first imported; make it EGL whatever a test imports first.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "0")
