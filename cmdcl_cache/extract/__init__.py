"""<<room docstring>>"""
