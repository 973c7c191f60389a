# CPU image: the same install as the README. Any entry point runs; the default is the benchmark's help.
#   docker build -t layerskip .
#   docker run --rm layerskip python generate.py --prompt "def fib(n):" --sample False
# CUDA variant: see DOCKER.md (build with --build-arg BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime).
ARG BASE=python:3.11-slim
FROM ${BASE}

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .

ENV HF_HOME=/cache/huggingface
VOLUME ["/cache/huggingface", "/app/logs"]
ENTRYPOINT []
CMD ["python", "benchmark.py", "--help"]
