module mxrules/sescheck

go 1.19
