# vit-pipeline on GPU nodes: an official CUDA-enabled PyTorch image with the project installed
# and the DeepSpeed ops of the GPU path compiled in, so no job compiles at start-up.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t vit-pipeline .
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/runs:/opt/vit-pipeline/runs \
#       -v $PWD/mlruns:/opt/vit-pipeline/mlruns -e MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db \
#       vit-pipeline deepspeed --num_gpus 8 launch/train.py --config vit_h14.yaml
#
# The runs and the MLflow store live in mounted folders: the container's own disk goes with it.
# The base image's torch and CUDA are the pin in constraints.txt (torch==2.15.0, a cu132 build), so
# pip keeps the image's torch and DeepSpeed's ops build against its CUDA; tests/test_environment.py
# holds the two equal. The devel variant carries nvcc, which DeepSpeed's op builder needs.
FROM pytorch/pytorch:2.15.0-cuda13.2-cudnn9-devel

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# libaio: DeepSpeed's async I/O op (ZeRO-Infinity NVMe offload); git: the commit tag in MLflow.
RUN apt-get update && apt-get install -y --no-install-recommends libaio-dev git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/vit-pipeline
# Prebuild the DeepSpeed ops used on the GPU path: CPU Adam (deepspeed.offload_optimizer=cpu),
# async I/O (nvme offload) and the flatten/unflatten utils ZeRO uses. A100 (8.0) and H100/H200 (9.0).
ENV DS_BUILD_CPU_ADAM=1 DS_BUILD_AIO=1 DS_BUILD_UTILS=1 TORCH_CUDA_ARCH_LIST="8.0;9.0"
COPY pyproject.toml README.md constraints.txt ./
COPY pipeline ./pipeline
# The tested versions (constraints.txt), as `make install` uses them.
RUN pip install -c constraints.txt ".[demo]" && ds_report
COPY launch ./launch
COPY configs ./configs
COPY slurm ./slurm
COPY benchmarks ./benchmarks

# The image has no .git: MLflow's git_commit tag comes from the build argument.
ARG GIT_COMMIT=unknown
ENV VIT_PIPELINE_GIT_COMMIT=${GIT_COMMIT}
VOLUME ["/opt/vit-pipeline/runs", "/opt/vit-pipeline/mlruns"]

CMD ["python", "launch/train.py", "--help"]
