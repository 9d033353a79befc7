# The Airflow image MaaS runs in: the official Airflow 3 image plus the project's pinned runtime
# dependencies (TensorFlow, Great Expectations, the MinIO client, ...) and the maas_tasks/serving packages,
# so DAG tasks import the same code and versions that the tests run against.
#
# Built by docker-compose.yaml (build context: the repository root); see .dockerignore for what is sent.
FROM apache/airflow:3.3.2-python3.11

# requirements.txt pins the full resolved set, apache-airflow==3.3.2 included, so installing it cannot
# move Airflow away from the version of the base image. Installed before the project sources are copied
# so that editing code does not invalidate this (large) layer.
COPY --chown=airflow:0 requirements.txt /opt/maas/requirements.txt
RUN pip install --no-cache-dir -r /opt/maas/requirements.txt

# TENSORFLOW_VARIANT=and-cuda (the gpu profile's worker) adds NVIDIA's CUDA and cuDNN libraries, pinned in
# docker/requirements-cuda.txt, so TensorFlow can use the GPUs the container is given; the default (cpu)
# image goes without those gigabytes of wheels. -c keeps every package of requirements.txt at its pin.
ARG TENSORFLOW_VARIANT=cpu
COPY --chown=airflow:0 docker/requirements-cuda.txt /opt/maas/requirements-cuda.txt
RUN case "$TENSORFLOW_VARIANT" in \
      cpu) ;; \
      and-cuda) pip install --no-cache-dir -c /opt/maas/requirements.txt -r /opt/maas/requirements-cuda.txt ;; \
      *) echo "TENSORFLOW_VARIANT=$TENSORFLOW_VARIANT: use cpu or and-cuda" >&2; exit 1 ;; \
    esac

# --no-deps: every dependency is already pinned above; the project must not pull in anything else.
# README.md is copied because pyproject.toml names it as the package readme (setuptools needs it to build).
COPY --chown=airflow:0 pyproject.toml README.md /opt/maas/
COPY --chown=airflow:0 maas_tasks /opt/maas/maas_tasks
COPY --chown=airflow:0 serving /opt/maas/serving
RUN pip install --no-cache-dir --no-deps /opt/maas

# Holds the simple auth manager's password file (written by airflow-init, read by the API server).
# Created here so the named volume mounted on it inherits the airflow user's ownership; group 0
# keeps it writable when AIRFLOW_UID runs the containers as another uid with gid 0.
RUN mkdir -p -m 0770 /opt/airflow/auth
