"""Running deepserve as a service: the admin API, the tenant usage API and the web
console (``admin/api.py``; the console's files are in ``deepserve/console``)."""
