package deploytest

import (
	"testing"

	"github.com/meshlite/meshlite/e2e/sandbox"
)

func TestMain(m *testing.M) { sandbox.TestMain(m) }
