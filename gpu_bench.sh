#!/bin/bash
# One device call: the compiled training step of the paper-size LeWM (issue 14's open measurement).
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f $__EGL_VENDOR_LIBRARY_FILENAMES ] || unset __EGL_VENDOR_LIBRARY_FILENAMES
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -e leworld/configs ] || ln -s ../configs leworld/configs
export PYTHONPATH=$PWD:/tmp/site MUJOCO_GL=egl PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import torch; print(torch.__version__)" >> $OUT/gpu.txt 2>&1
git rev-parse HEAD >> $OUT/gpu.txt 2>&1
timeout 290 python3 -m leworld.bench train "train.models=[lewm]" train.scale=gpu "train.compile=[false,true]" > $OUT/b128.txt 2>&1
echo "rc=$?" >> $OUT/b128.txt
timeout 230 python3 -m leworld.bench train "train.models=[lewm]" train.scale=gpu "train.compile=[false,true]" train.batch_size=512 > $OUT/b512.txt 2>&1
echo "rc=$?" >> $OUT/b512.txt
cat $OUT/gpu.txt; tail -n 12 $OUT/b128.txt $OUT/b512.txt
