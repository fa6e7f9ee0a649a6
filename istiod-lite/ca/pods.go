package ca

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"
)

const nodeIndex = "spec.nodeName"

// InformerPods answers Pods from a shared pod informer.
type InformerPods struct {
	informer cache.SharedIndexInformer
}

// NewInformerPods adds a node index to informer; call it before the
// informer starts.
func NewInformerPods(informer cache.SharedIndexInformer) (*InformerPods, error) {
	err := informer.AddIndexers(cache.Indexers{nodeIndex: func(obj any) ([]string, error) {
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Spec.NodeName == "" {
			return nil, nil
		}
		return []string{p.Spec.NodeName}, nil
	}})
	if err != nil {
		return nil, fmt.Errorf("index pods by node: %w", err)
	}
	return &InformerPods{informer: informer}, nil
}

// Pod returns pod namespace/name or nil.
func (p *InformerPods) Pod(namespace, name string) *corev1.Pod {
	o, ok, err := p.informer.GetIndexer().GetByKey(namespace + "/" + name)
	if err != nil || !ok {
		return nil
	}
	pod, _ := o.(*corev1.Pod)
	return pod
}

// PodsOnNode lists the pods bound to node.
func (p *InformerPods) PodsOnNode(node string) []*corev1.Pod {
	objs, err := p.informer.GetIndexer().ByIndex(nodeIndex, node)
	if err != nil {
		return nil
	}
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		if pod, ok := o.(*corev1.Pod); ok {
			out = append(out, pod)
		}
	}
	return out
}
