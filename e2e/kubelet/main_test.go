package kubelet

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary doubles as kubelet-init (as the sandbox CLI does) and as
// the container image "testsrv" of the runtime tests.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == InitVerb {
		if err := InitMain(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
		os.Exit(127)
	}
	if filepath.Base(os.Args[0]) == "testsrv" {
		os.Exit(testServerMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// testInfo is what testsrv reports about the place it runs in.
type testInfo struct {
	Hostname string            `json:"hostname"`
	Env      map[string]string `json:"env"`
	Resolv   string            `json:"resolv"`
	Hosts    string            `json:"hosts"`
	NetnsIno uint64            `json:"netnsIno"`
	Cwd      string            `json:"cwd"`
	UID      int               `json:"uid"`
}

// testServerMain is the container process of the runtime tests:
//
//	testsrv serve <addr> <data-dir>  HTTP: /info, /healthz (500 while <data-dir>/unhealthy exists), /write?f=&v=
//	testsrv exit <code>              prints a line and exits with code
func testServerMain(args []string) int {
	if len(args) < 1 {
		fmt.Fprintln(os.Stderr, "testsrv: mode?")
		return 2
	}
	switch args[0] {
	case "exit":
		fmt.Println("testsrv exiting with", args[1])
		var code int
		fmt.Sscan(args[1], &code)
		return code
	case "serve":
	default:
		return 2
	}
	addr, dataDir := args[1], args[2]
	// A fresh instance starts healthy (the liveness test restarts it).
	os.Remove(filepath.Join(dataDir, "unhealthy"))
	mux := http.NewServeMux()
	mux.HandleFunc("/info", func(w http.ResponseWriter, _ *http.Request) {
		var info testInfo
		info.Hostname, _ = os.Hostname()
		info.Env = map[string]string{}
		for _, kv := range os.Environ() {
			k, v, _ := strings.Cut(kv, "=")
			info.Env[k] = v
		}
		b, _ := os.ReadFile("/etc/resolv.conf")
		info.Resolv = string(b)
		b, _ = os.ReadFile("/etc/hosts")
		info.Hosts = string(b)
		info.NetnsIno, _ = netnsInode("/proc/self/ns/net")
		info.Cwd, _ = os.Getwd()
		info.UID = os.Getuid()
		_ = json.NewEncoder(w).Encode(info)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if _, err := os.Stat(filepath.Join(dataDir, "unhealthy")); err == nil {
			http.Error(w, "unhealthy", 500)
			return
		}
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/file", func(w http.ResponseWriter, r *http.Request) {
		b, err := os.ReadFile(r.URL.Query().Get("f"))
		if err != nil {
			http.Error(w, err.Error(), 404)
			return
		}
		_, _ = w.Write(b)
	})
	mux.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
		if err := os.WriteFile(r.URL.Query().Get("f"), []byte(r.URL.Query().Get("v")), 0o644); err != nil {
			http.Error(w, err.Error(), 500)
		}
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testsrv:", err)
		return 1
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	go func() {
		<-sigs
		fmt.Println("testsrv got SIGTERM")
		time.Sleep(50 * time.Millisecond)
		os.Exit(0)
	}()
	fmt.Println("testsrv starting on", ln.Addr())
	fmt.Fprintln(os.Stderr, "testsrv stderr line")
	_ = http.Serve(ln, mux)
	return 1
}
