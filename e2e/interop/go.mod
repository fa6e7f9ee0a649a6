module github.com/meshlite/meshlite/e2e/interop

go 1.26.0

replace github.com/meshlite/meshlite => ../..
