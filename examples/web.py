# -*- coding:utf-8 -*-
# The original report's web.py, unchanged: a bottle "Hello World".
#
#   pip install bottle==0.13.5      # the report used 0.12.13, which does not install on
#                                   # Python 3.10 and newer; 0.13.5 runs on 3.6 - 3.13
#   gunicorn -c config.py web:app
from bottle import route, run, default_app

@route('/')
def index():
  return 'Hello World'

app = default_app()
