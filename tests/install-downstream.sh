#!/usr/bin/env bash
# The packages tests/test_downstream.py runs unedited on vqdeploy: audiolm-pytorch 2.4.0 (SoundStream),
# meshgpt-pytorch 1.7.2 (MeshAutoencoder) and magvit2-pytorch 0.5.1 (VideoTokenizer), with what their model
# modules import, into the current environment.  Left out, as heavy and unused by these models: fairseq,
# transformers, encodec, open-clip, classifier-free-guidance-pytorch (MeshTransformer's text conditioning) and
# torchvision (magvit2's VGG perceptual loss, whose weights are a download); the test stands in for the last two.
# --no-deps for the packages themselves: they require vector-quantize-pytorch (which vqdeploy stands in for) and
# torchaudio pins its own torch.  torchaudio 2.11 is the newest release; its compiled extension is built for
# torch 2.11 with CUDA and does not load on torch 2.13, so it is removed: SoundStream uses only torchaudio's
# pure-torch transforms (MelSpectrogram, resample), which run without it.
set -euo pipefail
pip install --quiet "beartype==0.23.1" "environs==15.2.0" "jaxtyping==0.3.11" "einx==0.4.3" \
    "x-transformers==2.31.10" "local-attention==1.11.2" "taylor-series-linear-attention==0.2.0" \
    "gateloop-transformer==0.2.5" "pytorch-custom-utils==0.0.21" "huggingface_hub==2.4.0" \
    "torch-geometric==2.8.1" "accelerate==1.15.0" "kornia==0.9.0" tqdm
pip install --quiet --no-deps "audiolm-pytorch==2.4.0" "meshgpt-pytorch==1.7.2" "magvit2-pytorch==0.5.1" \
    "torchaudio==2.11.0"
torchaudio_lib="$(python -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("torchaudio").origin), "lib"))')"
rm -f "$torchaudio_lib"/*.so
