-- luacheck configuration: Lua 5.4, busted globals in specs.
std = "lua54"
max_line_length = 130
codes = true
files["spec/"] = { std = "+busted", max_line_length = 150 }
files["bench/"] = { max_line_length = 160 }
exclude_files = { "node_modules/", "build/" }
