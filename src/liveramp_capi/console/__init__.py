"""The delivery console: the Airflow UI pages of the conversions pipeline (plugin views and their API).

``reads`` and ``summaries`` are plain Python over the state database and the output files;
``runs`` reads Airflow's own tables; ``app`` is the FastAPI app the plugin mounts in the
api-server. Nothing here returns an identifier, an envelope, an IP or a consent string.
"""
