# Sourced by interactive shells in the workspace.
export PS1='ws:\w$ '
