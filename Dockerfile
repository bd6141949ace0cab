# The Airflow image of this project: apache/airflow 3.3.2 (Python 3.11, the version the pins in
# constraints.txt were resolved on) with the pinned requirements and the liveramp-capi package
# baked in. Nothing is installed at container start (no _PIP_ADDITIONAL_REQUIREMENTS): every
# scheduler, worker and triggerer runs exactly the same, tested set of packages.
#
#   docker compose build            # or: docker build -t liveramp-capi-airflow:0.1.0 .
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

USER airflow
WORKDIR /opt/airflow

# Dependencies first, in their own layer: code changes do not reinstall them.
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/capi/
RUN pip install --no-cache-dir -r /opt/capi/requirements.txt -c /opt/capi/constraints.txt

# The package itself (the provider: hooks, operators, sensors, triggers, notifiers), without
# dependencies: they are all pinned above.
COPY --chown=airflow:0 pyproject.toml README.md /opt/capi/
COPY --chown=airflow:0 src /opt/capi/src
RUN pip install --no-cache-dir --no-deps /opt/capi

# DAGs and the console plugin (the event schema ships inside the package). Development tools
# (devtools/: the stand-in, the bench, the demo, the sample partition) never enter the image.
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
